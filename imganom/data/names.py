"""File names as text. A name that is not valid UTF-8 (bytes from another system on a share) reaches Python
as a string with lone surrogates (``os.fsdecode``'s ``surrogateescape``): it still opens the file, but cannot
be written as UTF-8 or JSON. ``printable`` gives the form to show and store: undecodable bytes as ``\\xNN``.
"""

from __future__ import annotations


def printable(text: str) -> str:
    """``text`` with undecodable file-name bytes as ``\\xNN`` (other lone surrogates as ``\\udNNN``).

    Valid text comes back unchanged; the result always encodes as UTF-8, so it is safe for ids, rows, JSON,
    CSV, HTML and log lines. ``"bad\\udcff.png"`` (from ``b"bad\\xff.png"``) -> ``"bad\\\\xff.png"``.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that no file-name decoding produced
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
