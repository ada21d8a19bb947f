"""nftune: verifier-driven online fine-tuning with Negative-aware Fine-Tuning (NFT)."""

__version__ = "0.1.0"
