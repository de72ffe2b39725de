"""Ids and markers shared by the data pipeline, the model and generation (SPEC §3, §5)."""
IMAGE_TOKEN_INDEX = -200  # placeholder id for the image in tokenized text
IGNORE_INDEX = -100  # label value that the loss skips
DEFAULT_IMAGE_TOKEN = "<image>"
EOT_ID = 0  # end of text and padding
DOUBLE_NEWLINE_ID = 261  # "\n\n": ends a turn
ASSISTANT_PREFIX_LEN = 3  # "Assistant:" = [5585, 41693, 59], masked in every gpt turn
