"""Phi-3-mini's four target linear layers (d_in, d_out) and the expert libraries the speed targets use."""

PHI3_MINI_SHAPES = {
    "qkv_proj": (3072, 9216),
    "o_proj": (3072, 3072),
    "gate_up_proj": (3072, 16384),
    "down_proj": (8192, 3072),
}
LIBRARIES = {"E10_r4": (10, 4), "E64_r8": (64, 8)}
TOP_K = 3
