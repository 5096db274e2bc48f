"""Infrastructure shared by every stage: errors, atomic writes, folder names, frames, precision, run records."""
