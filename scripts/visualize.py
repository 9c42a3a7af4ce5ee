#!/usr/bin/env python
"""PNG figures of a MIM checkpoint: masks, token maps, tokenizer and predicted reconstructions, codebook usage,
training curves. See `python scripts/visualize.py --help`.

    python scripts/visualize.py --model_name_or_path ./beit --images ./images/cat.jpg ./more_images \
        --output_dir ./figures
"""

from hf_mim.visualization import main

if __name__ == "__main__":
    main()
