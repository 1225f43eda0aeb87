"""`isokl-tl`, the command line: a thin click shell over the `isokl_tl` library.

It is a package of its own so that `isokl-tl --help` never imports the library (torch and
TransformerLens take seconds to import): every command imports what it needs when it runs.
"""
