"""Imported by the verifier's fork server: workers fork from a process with math-verify warm."""

from nftune.verify import warm_up

warm_up()
