"""Synthesis of training data: OCR text, dense captions, and think-with-image traces run in a sandbox."""
