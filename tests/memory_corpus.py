"""A small corpus for the graph memory's tests and benchmark: several
documents, in all three formats, that overlap (two sources for one fact) and
conflict (two founding years, two headquarters), with questions whose
supporting sentences are known."""

from __future__ import annotations

from typing import Final

DOCUMENTS: Final = {
    "acme-history": (
        "markdown",
        """# Acme Corporation

**Acme Corporation** was founded in 1998 by Jane Doe in Springfield.
Acme Corporation is headquartered in Springfield.

Jane Doe is the CEO of Acme Corporation. Doe previously worked for Globex Corporation.

## Products

- Acme makes the "Roadrunner Trap", a mechanical trap.
- Acme also makes rocket skates.

In 2015, Acme acquired Initech for $2 billion. Acme has 5,000 employees.

```python
print("Acme was founded by Nobody")
```
""",
    ),
    "acme-wiki": (
        "html",
        """<!doctype html>
<html><head><title>Acme Corp. &ndash; Wiki</title>
<style>p { color: red }</style></head>
<body>
<h1>Acme Corp.</h1>
<p>Acme Corp. was founded in 1999 by Jane Doe and John Smith.
John Smith works for Acme Corp. as chief engineer.</p>
<p>Acme acquired Initech in 2015. Acme Corporation is headquartered in Shelbyville.</p>
<script>document.write("Acme was founded by Nobody");</script>
</body></html>
""",
    ),
    "globex-press": (
        "text",
        "Globex Corporation announced a new product on 3 March 2020.\r\n"
        "Hank Scorpio is the CEO of Globex. Globex is based in Cypress Creek.\r\n\r\n"
        "Globex acquired Umbrella Ltd. in 2019. Its shares rose 4% on the news.\r\n",
    ),
    "ibm-notes": (
        "text",
        "International Business Machines (IBM) is an American technology company. "
        "IBM is based in Armonk. IBM acquired Red Hat in 2019. "
        "Arvind Krishna is the CEO of IBM.",
    ),
    "curie": (
        "markdown",
        "Marie Curie was a physicist and chemist. Marie Curie was born in Warsaw.\n"
        "She won the Nobel Prize in Physics in 1903.\n\n"
        "Marie Curie worked for the *University of Paris*.",
    ),
}

# question -> sentences (exact text) an answer must cite; none = "not found".
QUESTIONS: Final[dict[str, tuple[str, ...]]] = {
    "Who founded Acme?": (
        "Acme Corporation was founded in 1998 by Jane Doe in Springfield.",
        "Acme Corp. was founded in 1999 by Jane Doe and John Smith.",
    ),
    "When was Acme founded?": (
        "Acme Corporation was founded in 1998 by Jane Doe in Springfield.",
        "Acme Corp. was founded in 1999 by Jane Doe and John Smith.",
    ),
    "Where is Acme headquartered?": (
        "Acme Corporation is headquartered in Springfield.",
        "Acme Corporation is headquartered in Shelbyville.",
    ),
    "Who is the CEO of Globex?": ("Hank Scorpio is the CEO of Globex.",),
    "Where is Globex based?": ("Globex is based in Cypress Creek.",),
    "What did IBM acquire?": ("IBM acquired Red Hat in 2019.",),
    "Who is the CEO of International Business Machines?": ("Arvind Krishna is the CEO of IBM.",),
    "How many employees does Acme have?": ("Acme has 5,000 employees.",),
    "Which company did Globex acquire?": ("Globex acquired Umbrella Ltd. in 2019.",),
    "Where was Marie Curie born?": ("Marie Curie was born in Warsaw.",),
    "who does john smith work for?": ("John Smith works for Acme Corp. as chief engineer.",),
    "What does Acme make?": (
        'Acme makes the "Roadrunner Trap", a mechanical trap.',
        "Acme also makes rocket skates.",
    ),
    "Who acquired Initech?": (
        "In 2015, Acme acquired Initech for $2 billion.",
        "Acme acquired Initech in 2015.",
    ),
    "Who is the CEO of Initech?": (),
    # Initech was acquired; it acquired nothing.
    "What did Initech acquire?": (),
    # "Acme Labs" is not Acme: a name in a question is matched whole.
    "What did Acme Labs acquire?": (),
    "What is the capital of Mars?": (),
    "When was Globex founded?": (),
    "Who founded Umbrella?": (),
    "Where is Initech based?": (),
}
