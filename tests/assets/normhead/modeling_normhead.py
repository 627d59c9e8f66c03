"""A tiny stand-in for Baichuan2's remote code: GPT-NeoX with Baichuan2's `NormHead` as its output layer.

`NormHead` is copied in behaviour from Baichuan2's modeling_baichuan.py: on the first forward in eval mode
it replaces `weight.data` with the row-normalized weight and clears `first_flag`; later eval forwards use the
stored weight as it is. A merger that keeps the tensor it captured writes into a dead tensor from then on.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GPTNeoXForCausalLM


class NormHead(nn.Module):
    def __init__(self, hidden_size, vocab_size, bias=False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty((vocab_size, hidden_size)))
        nn.init.normal_(self.weight, std=0.02)
        self.first_flag = True

    def forward(self, hidden_states):
        if self.training:
            norm_weight = F.normalize(self.weight)
            self.first_flag = True
        elif self.first_flag:
            self.first_flag = False
            self.weight.data = F.normalize(self.weight)
            norm_weight = self.weight
        else:
            norm_weight = self.weight
        return F.linear(hidden_states, norm_weight)


class NormHeadForCausalLM(GPTNeoXForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        self.lm_head = NormHead(config.hidden_size, config.vocab_size)
        self.post_init()
