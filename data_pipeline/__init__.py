"""Data: genome files -> normalised records -> tokenizers -> WebDataset shards -> windows.

Importing the package registers its tokenizers.
"""

from data_pipeline import tokenizers as tokenizers
