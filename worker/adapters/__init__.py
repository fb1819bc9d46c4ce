"""AsymLoRA adapters: the layer maths, the on-disk format (names and specs in
`format`, tensors in `weights`), the versioned Redis store, the worker's
byte-bounded cache, the host the serving engine talks to, and training.
Builds on the model package; never imports serving. `format` and `store`
import no torch: the operator uses them."""
