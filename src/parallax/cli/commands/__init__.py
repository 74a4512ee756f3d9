"""One module per ``parallax`` subcommand (``prepare_text.py`` -> ``parallax prepare-text``)."""
