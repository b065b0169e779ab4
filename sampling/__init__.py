"""The parts of generate.py: per-index seeds and labels (``seeds``), the model, decoder and
output folder (``setup``), the sample set's identity (``identity``), PNG and npz files (``npz``)
and the sampling of a list of indices (``run``). train.py's evaluation during training uses the
same code path."""
