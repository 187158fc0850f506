"""`python -m ftstudio.chatworker`: the chat worker's entry point (the code is in `ftstudio.chat.worker`).

A stable name: a studio of any release starts its chat worker by it.
"""

from ftstudio.chat.worker import main as main

if __name__ == "__main__":
    raise SystemExit(main())
