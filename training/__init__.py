"""Fine-tuning (finetune_CoDe.py): the loop, the data and its token cache, the losses, and VAR's schedule
and loss scaling. The models themselves are models/'s: teacher forcing is VAR.forward."""
