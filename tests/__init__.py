"""fedfin tests: each file proves one part of the behaviour, through public interfaces."""
