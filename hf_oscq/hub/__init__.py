"""Publishing: model cards of an export folder and the Hub push (parent repo, one repo per bit-width, collection)."""

DEFAULT_LICENSE = "apache-2.0"
ACCURACY_PLOT = "oscq_accuracy_vs_bits.png"
HISTOGRAM_PLOT = "oscq_weight_histogram.png"
