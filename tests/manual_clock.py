"""A clock that moves only when a test moves it (for code that takes `clock=`)."""


class ManualClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now
