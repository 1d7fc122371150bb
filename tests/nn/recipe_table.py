"""The recipes of the README and DESIGN.md, written out from the docs (not from lowbit's code)."""

# name -> (weight format, weight options, activation format or None, activation options), from the docs
DOCUMENTED = {
    "a16w8-int8": ("int8", {}, None, {}),
    "a16w8-fp8": ("fp8_e4m3", {}, None, {}),
    "a16w4-int-g32": ("int4", {"group_size": 32}, None, {}),
    "a16w4-int-g64": ("int4", {"group_size": 64}, None, {}),
    "a16w4-int-g128": ("int4", {"group_size": 128}, None, {}),
    "a16w3-int-g64": ("int3", {"group_size": 64}, None, {}),
    "a16w2-int-g64": ("int2", {"group_size": 64}, None, {}),
    "a8w8-fp8": ("fp8_e4m3", {}, "fp8_e4m3", {"granularity": "token"}),
    "a8w8-int8": ("int8", {}, "int8", {"granularity": "token"}),
    "a16w8-mxfp8": ("mxfp8_e4m3", {}, None, {}),
    "a16w6-mxfp6": ("mxfp6_e2m3", {}, None, {}),
    "a16w4-mxfp4": ("mxfp4", {}, None, {}),
    "a16w4-nvfp4": ("nvfp4", {}, None, {}),
    "a8w4-mxfp4": ("mxfp4", {}, "mxfp8_e4m3", {}),
    "a8w4-fp8-mxfp4": ("mxfp4", {}, "fp8_e4m3", {"granularity": "token"}),
    "a4w4-mxfp4": ("mxfp4", {}, "mxfp4", {}),
    "a4w4-nvfp4": ("nvfp4", {}, "nvfp4", {}),
}
