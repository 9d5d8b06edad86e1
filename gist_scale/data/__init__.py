"""The data path: triplet sources -> validated rows -> dual tokenization -> global batches -> typed micro-batches.

Prepared (the default): `load_triplets` reads every source into one validated, memory-mapped Arrow dataset,
`tokenize_triplets` tokenizes it once for the student and once for the guide (both cached by `datasets`), and
`GlobalBatchSampler` plans task-homogeneous global batches per epoch, which `build_dataloader` collates.
Streamed (`data.streaming`): `StreamingBatches` reads, validates and tokenizes rows as training consumes them.
Both cut each global batch into this rank's micro-batches with the same pure `rank_micro_batches`, and both hand the
step `TripletBatch`es.

One job per module:

- `sources`: `data.path` or a mixture source resolved to files, a folder's split or a hub dataset; reading them
- `rows`: column mapping, row validation with its `FILE:LINE: field 'F': reason` errors, `DataReport`
- `tokenize`: the student's and the guide's token ids, cached, with truncation and prompt lengths
- `batching`: `rank_micro_batches` and the prepared path's `GlobalBatchSampler`
- `collate`: `TripletCollator` -> `TripletBatch`, `TokenCounts`, `text_identities`
- `mixture`: weighted sources: quotas, `SourcePlan`, `MixtureMeter`, mixture.json and the summary's table
- `loader`: the prepared path assembled: `load_triplets`, `build_sampler`, `build_dataloader`
- `streaming`: the streamed path: `StreamingBatches`, `stream_fingerprint`
- `errors`: `DataError`
"""

from gist_scale.data.batching import GlobalBatchSampler, SamplerSummary, rank_micro_batches
from gist_scale.data.collate import TokenCounts, TripletBatch, TripletCollator, text_identities
from gist_scale.data.errors import DataError
from gist_scale.data.loader import build_dataloader, build_sampler, load_triplets
from gist_scale.data.mixture import MixtureMeter, SourcePlan, mixture_lines, mixture_quotas, write_mixture
from gist_scale.data.rows import DataReport, SourceReport
from gist_scale.data.sources import FORMATS, read_local_file, sample_data_path
from gist_scale.data.streaming import StreamingBatches, stream_fingerprint
from gist_scale.data.tokenize import count_tokens, measure_tokenization_rate, tokenize_triplets

__all__ = ["FORMATS", "DataError", "DataReport", "GlobalBatchSampler", "MixtureMeter", "SamplerSummary", "SourcePlan",
           "SourceReport", "StreamingBatches", "TokenCounts", "TripletBatch", "TripletCollator", "build_dataloader",
           "build_sampler", "count_tokens", "load_triplets", "measure_tokenization_rate", "mixture_lines",
           "mixture_quotas", "rank_micro_batches", "read_local_file", "sample_data_path", "stream_fingerprint",
           "text_identities", "tokenize_triplets", "write_mixture"]
