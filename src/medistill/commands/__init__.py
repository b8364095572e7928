"""What the commands do beyond one training run, each a plain function that ``cli.py`` calls and
a notebook can call too: re-evaluation and external validation (``evaluate``), export and
prediction (``deploy``), grids over methods and seeds (``sweep``), paper recipes (``recipe``)
and the end-to-end demo (``demo``). They sit on top of every other layer; nothing below imports
them."""
