"""The LLaMA tokenizer: SentencePiece `tokenizer.model`, read the way original LLaVA reads it.

LLaVA-1.5 was trained with transformers' slow ("legacy") LlamaTokenizer. Two of its habits
matter for matching the published checkpoints, and both are reproduced here:
  * special tokens written in the text ("<s>", "</s>") become their ids, and every piece of
    text between them is encoded on its own, so it gets SentencePiece's dummy-prefix space;
  * around "<image>" the text is cut into chunks, each encoded on its own, with the image
    placeholder id between them (the original's `tokenizer_image_token`).
"""
import re
from pathlib import Path

import sentencepiece as spm

from .constants import IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX

SPECIAL = re.compile(r"(<s>|</s>)")


class Tokenizer:
    def __init__(self, path):
        """`path`: a tokenizer.model file, or a checkpoint folder that holds one."""
        path = Path(path)
        file = path / "tokenizer.model" if path.is_dir() else path
        if not file.exists():
            raise FileNotFoundError(f"{path}: no tokenizer.model (the SentencePiece file LLaMA models ship)")
        self.sp = spm.SentencePieceProcessor(model_file=str(file))
        self.file = file
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()   # 1 and 2 for LLaMA
        self.pad_id = 0                                                  # LLaVA pads with <unk> = 0
        self.vocab_size = self.sp.get_piece_size()

    def encode(self, text, bos=False):
        """Text -> ids, with "<s>" and "</s>" in the text read as the special tokens."""
        ids = [self.bos_id] if bos else []
        for piece in SPECIAL.split(text):
            if piece == "<s>":
                ids.append(self.bos_id)
            elif piece == "</s>":
                ids.append(self.eos_id)
            elif piece:
                ids += self.sp.encode(piece)       # with the dummy prefix: "USER" -> "▁USER"
        return ids

    def encode_prompt(self, text):
        """A whole prompt -> ids: BOS, then the chunks around each "<image>" with IMAGE_TOKEN_INDEX
        between them. With the LLaMA tokenizer "USER: <image>\\nWhat" gives
        ... ':' '▁' <-200> '▁' '<0x0A>' 'What' ..., exactly as the original does."""
        ids = [self.bos_id]
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
            ids += self.encode(chunk)
        return ids

    def decode(self, ids):
        """Ids -> text, leaving out special tokens, padding and image placeholders."""
        specials = {self.bos_id, self.eos_id, self.pad_id, IMAGE_TOKEN_INDEX}
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])
