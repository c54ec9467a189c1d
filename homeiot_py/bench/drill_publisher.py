"""``make drill-publisher``: the 60 s publisher drill (see ``tests/drill.py``); prints one line."""

from tests.drill import main

if __name__ == "__main__":
    main()
