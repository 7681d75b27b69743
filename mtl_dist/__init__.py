"""mtl-dist: multi-task ranking models trained at scale (TorchRec tables, DDP heads).

Packages by stage, each importing only the stages before it (``tests/test_layout.py``):

    config, files → distributed → data → models → balancing → loop → checkpoint → observe
    → serve → train → tools
"""
