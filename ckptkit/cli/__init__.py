"""The ``ckptkit`` command line: parse, call a library function, render. Torch-free."""
