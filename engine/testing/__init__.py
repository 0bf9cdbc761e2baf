"""Test helpers shipped with the package (the torch_npu stand-in, tiny model builders)."""
