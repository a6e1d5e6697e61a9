"""The testbed: synthetic tasks, the toy models built from configs, their training, and the shipped
trained weights. Evidence for the library, not part of it: the core never imports from here."""
