from setuptools import find_packages, setup

setup(
    name="patch-megatron",
    version="0.1.0",
    description="Patch-level training and Evolving Subnetwork Training on megatron-core",
    packages=find_packages(include=["patch_megatron", "patch_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # 2.13.0 (the CPU wheel on a fresh machine) must satisfy this range.
        "torch>=2.5,<2.14",  # 2.5: scaled_dot_product_attention(enable_gqa=)
        # 0.17+ needs Python 3.12; 0.16.x is the line that installs on 3.11.
        "megatron-core>=0.16,<0.17",
        "sentencepiece>=0.2",
        "numpy>=1.24",
        # megatron-core's dist_checkpointing needs it and does not declare it.
        "psutil>=5.9",
        # Hugging Face export (weights and tokenizer) and the quickstart's plot.
        "safetensors>=0.4",
        "transformers>=4.40",
        "matplotlib>=3.5",
    ],
    extras_require={
        "test": ["pytest>=7"],
    },
)
