"""Readers of foreign checkpoint layouts, chosen by content and read through a Store with ranged reads.

- :mod:`.sniff`: ``detect(store, key) -> Detected(kind, detail)``, from the first and last few KB;
- :mod:`.zipfile_reader`: the central directory, record offsets and ``crc_check`` of a zip;
- :mod:`.torchfile`: ``read_torch_file`` for torch.save zip, legacy and bare-pickle files;
- :mod:`.safetensors`: ``read_safetensors_header`` with the reference implementation's checks;
- :mod:`.hf_index`: ``read_hf_index`` for Hugging Face ``*.index.json`` files and their shards;
- :mod:`.dcp`: ``read_dcp`` for torch.distributed.checkpoint directories.

Imports are kept per module (nothing is re-exported here) so that ckptkit's native format, which
shares the safetensors header checks, does not pull in the pickle interpreter. Torch-free.
"""
