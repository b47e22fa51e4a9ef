"""What the CMRxRecon2025 organisers define, in one place (docs/cmrxrecon.md §5, §6).

- `ranking`: the `run4Ranking_2025.m` reduction (crop, slices, frames) of an image to `img4ranking`;
- `metrics`: the two official scorers' per-file metrics and their aggregation;
- `submission`: the submission tree (paths, case identity) and `img4ranking` files;
- `masks`: the official sampling-mask generators (2025, and 2024's ktUniform).

Reconstruction, evaluation and the benchmarks use these definitions; nothing here trains or runs a
model. The only project code this package imports is the FFT convention (`shards.fft`, numpy only).
"""
