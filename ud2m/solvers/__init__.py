"""Solvers: the single-step kernels shared by the zero-shot algorithms and the unfolded sampler (``steps``), and
one pure function per paper algorithm."""
