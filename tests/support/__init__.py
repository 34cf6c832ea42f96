"""What the tests share: the fake Hub (`hubserver`), launching and driving the app (`apptools`), the headless browser
(`browser`)."""
