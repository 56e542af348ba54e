"""The small world: a procedural world small enough that every model in it is trained here.

Subjects are shapes (the class a caption names) whose identity, a colour and a pattern, shows only in the
reference; captions name the context (where the subject stands and the background). Held-out subjects never
appear in any training data. ``scene`` draws and renders it, ``judge`` reads identity and context back from an
image, ``base`` builds and trains the world's Stable Diffusion 1.x-style base model, ``proof`` runs the
toolkit's own jobs on it and prints the table.
"""
