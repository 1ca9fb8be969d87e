"""``python -m imganom`` (and ``torchrun -m imganom``): the command line."""

from imganom.cli.main import main

main()
