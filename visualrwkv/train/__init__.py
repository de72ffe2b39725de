"""Two-stage training, ``visualrwkv train`` (SPEC §7). Lightning is imported only inside this package.

    config.py     flags of the original train.py -> TrainConfig (checked, with derived fields)
    schedule.py   deterministic sample order, lr / weight-decay schedule, AdamW groups
    data.py       up-front data check (cached), dataset and resumable DataLoader
    model.py      model from --load_model / --model_path / flags, freezing, --dropout
    module.py     the LightningModule: training step, optimizer, resumable state
    callbacks.py  schedule per step, logs, rwkv-<epoch>.pth, train_log.txt, last.ckpt
    cli.py        main(argv) and train(cfg)

Programmatic use: ``train(parse_args([...]))`` from ``visualrwkv.train.cli``.
"""
