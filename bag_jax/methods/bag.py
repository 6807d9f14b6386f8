"""BAG (Baek et al., JKSCI 2024; docs/algorithms.md 8.2, our reading of the paper): AdaDFQ's two
losses plus two parts, each of which switches off on its own:

  (a) a bit-width aware generator: the generator's weights are fake-quantized at the student's
      w_bits with the student's quantizer (generator.quantize; optionally its activations at
      a_bits, generator.quantize_activations), so it makes images a low-bit network can make;
  (b) intermediate-layer distillation with channel-wise attention: L_Q gains
      mu * sum_layers || A(F_s) - A(F_t) ||^2 over the residual units' features
      (loss.channel_attention = mu, loss.channel_attention_form, loss.channel_attention_layers;
      bag_jax.losses.channel_attention_loss).

Both are generic: the networks take a QuantSpec (a), and the iteration adds (b) to any method's
L_Q where loss.channel_attention > 0, so GDFQ or AdaDFQ with either part is a config away. This
module is BAG's preset of the two: AdaDFQ's losses; configs/base.py turns (a) and (b) on for it
(generator.quantize=True, loss.channel_attention=5).
"""

import dataclasses

from bag_jax.methods import adadfq

METHOD = dataclasses.replace(adadfq.METHOD, name='bag', hypers=adadfq.METHOD.hypers + ('channel_attention',))
