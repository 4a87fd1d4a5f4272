from setuptools import find_packages, setup

setup(
    name="patch-megatron",
    version="0.1.0",
    description="Patch-level training and Evolving Subnetwork Training on megatron-core",
    packages=find_packages(include=["patch_megatron", "patch_megatron.*"]),
    python_requires=">=3.10",
    install_requires=[
        # Every bound here was run: the upper ends are what a fresh install resolves (.ci/run
        # tests in a new environment), the lower ends are pinned in .ci/oldest.txt and tested
        # there too. Widen a bound only together with a run at the new end.
        # 2.13.0 is the CPU wheel on a fresh machine; no other torch has been run.
        "torch>=2.13,<2.14",
        # 0.17+ needs Python 3.12; 0.16.1 is the release Megatron-LM's core_v0.16.1 pins.
        "megatron-core>=0.16.1,<0.17",
        "sentencepiece>=0.2,<0.3",
        "numpy>=1.26,<3",
        # megatron-core's dist_checkpointing needs it and does not declare it.
        "psutil>=5.9",
        # Hugging Face export (weights and tokenizer) and the quickstart's plot. 4.43 is the
        # first transformers whose fast tokenizers honour split_special_tokens.
        "safetensors>=0.4.1",
        "transformers>=4.43,<6",
        "matplotlib>=3.6",
    ],
    extras_require={
        # preprocess_data.py --split-sentences: NLTK's Punkt, pickle-free from 3.9.1 (3.9.0
        # fails on import without its WordNet data).
        "split-sentences": ["nltk>=3.9.1"],
        # --tokenizer-type TikTokenizer (megatron-core's wrapper of it).
        "tiktoken": ["tiktoken>=0.7"],
        "test": ["pytest>=7.4", "nltk>=3.9.1", "tiktoken>=0.7"],
    },
)
