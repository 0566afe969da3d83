"""The relearning attack: fine-tune an erased model on a few images of its concept and watch UA (`salun-sd relearn`)."""
