"""tf.data preprocessors for SeqIO tasks: denoising objectives (denoise), dialog objectives (dialog), and the
corruption-rate curriculum with the step-to-tf.data plumbing (curriculum). See docs/preprocessors.md."""

from t5k.preprocessors import curriculum, denoise, dialog  # noqa: F401
