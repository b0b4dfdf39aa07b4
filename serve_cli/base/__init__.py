"""The torch-free base that every package shares: the serving contract (the pixels of `images`, the `manifest`
of an export) and the conventions of `files` (atomic writes) and command lines (`cli`). Imports nothing of ours
outside it, and no torch."""
