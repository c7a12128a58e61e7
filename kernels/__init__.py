"""retrofit.kernels: fused Triton kernels. Import submodules explicitly; nothing is imported here."""
