"""Studies that measure the platform as users run it (``studies/<name>/README.md`` each).

Not part of the installed package: run them from the checkout's root (``python -m studies...``).
"""
