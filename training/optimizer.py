"""AdamW with the probe classifier as its own parameter group, and the classifier's learning-rate rule."""
import torch

CLASSIFIER_LR = 1e-4       # the authors' --learning-rate-class ...
CLASSIFIER_LR_SIT_B = 3e-2  # ... and their value for SiT-B
CLASSIFIER_PREFIX = "classifier."


def classifier_learning_rate(args, config):
    """--learning-rate-class when given; else the authors' rule: CLASSIFIER_LR_SIT_B for SiT-B,
    CLASSIFIER_LR otherwise."""
    if args.learning_rate_class is not None:
        return args.learning_rate_class
    name = args.model or config.model
    return CLASSIFIER_LR_SIT_B if name.startswith("SiT-B/") else CLASSIFIER_LR


def build_optimizer(args, config, model, device):
    """AdamW: the backbone with --learning-rate / --adam-weight-decay, the classifier with its own
    rate and --adam-weight-decay-class (the authors' two groups)."""
    classifier = [p for n, p in model.named_parameters() if n.startswith(CLASSIFIER_PREFIX)]
    backbone = [p for n, p in model.named_parameters() if not n.startswith(CLASSIFIER_PREFIX)]
    return torch.optim.AdamW(
        [{"params": backbone, "weight_decay": args.adam_weight_decay},
         {"params": classifier, "lr": classifier_learning_rate(args, config),
          "weight_decay": args.adam_weight_decay_class}],
        lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=device.type == "cuda")  # one kernel for all parameters on GPUs


def set_learning_rates(optimizer, args, config):
    """The flags' learning rates and weight decays, over those a resumed optimizer state saved."""
    for group, lr, decay in zip(optimizer.param_groups, (args.learning_rate, classifier_learning_rate(args, config)),
                                (args.adam_weight_decay, args.adam_weight_decay_class)):
        group.update(lr=lr, weight_decay=decay)
