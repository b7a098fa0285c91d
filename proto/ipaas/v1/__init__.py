"""Generated from proto/ipaas/v1 by scripts/gen_protos.py. Do not edit."""
