"""The labelling plan: how many actors, where each decodes, on which device, in which batch size.

Pure arithmetic over the job's settings and the cluster's resources (no Ray calls), chosen so that the
accelerator never waits and a CPU-only cluster is never starved: actors take fractional CPUs, never all.
"""

from __future__ import annotations

from dataclasses import dataclass

from fashionlabel import settings


class LabelError(RuntimeError):
    """A labelling run that cannot go ahead as asked (its output folder belongs to other inputs)."""


@dataclass(frozen=True)
class LabelConfig:
    """Args:
    batch_size: images per forward pass (default: 512 on a GPU, 256 on CPU).
    actors: predictor actors (default: ``actors_per_gpu`` per GPU, else from the CPUs).
    device: "cuda" / "cpu" (default: a GPU when the cluster has one).
    compile: compile the model in each actor (GPU: worth it on long runs).
    compile_cache: a folder on every node for the compiled model (an AOT package: built by the first actor
        that needs it, loaded in milliseconds by every later one) and its kernels; without it every actor
        runs ``torch.compile`` anew.
    decode: "cpu" (PIL in the read tasks), "gpu" (nvJPEG inside the actor, on its device), "split" (the
        read tasks decode ``cpu_decode_share`` of the images, the actor's device the rest) or "auto" (gpu
        when the actors have a GPU, else cpu).
    cpu_decode_share: with decode "split", the share of images the read tasks decode (0 < share < 1).
    actors_per_gpu: actors sharing one GPU, so decode/post-processing of one overlaps another's forward.
    read: "tasks" (Ray tasks of their own, ahead of the actors), "actor" (each actor reads the shard it
        labels) or "auto" (tasks with a GPU, actor on CPU).
    """

    batch_size: int | None = None
    actors: int | None = None
    device: str | None = None
    compile: bool = False
    compile_cache: str | None = None
    decode: str = "auto"
    cpu_decode_share: float = 0.5
    actors_per_gpu: int = 2
    read: str = "auto"

    def __post_init__(self) -> None:
        settings.check(
            "label",
            self,
            {
                "batch_size": self.batch_size is None or self.batch_size >= 1,
                "actors": self.actors is None or self.actors >= 1,
                "actors_per_gpu": self.actors_per_gpu >= 1,
                "device": self.device is None or self.device.split(":")[0] in ("cuda", "cpu"),
                "decode": self.decode in ("cpu", "gpu", "split", "auto"),
                "cpu_decode_share": 0 < self.cpu_decode_share < 1,
                "read": self.read in ("tasks", "actor", "auto"),
            },
            "batch size, actors, actors per GPU ≥ 1; device cuda or cpu; decode cpu, gpu, split or auto; "
            "CPU decode share between 0 and 1; read tasks, actor or auto",
        )
        cache = self.compile_cache
        settings.check(
            "label",
            self,
            # a folder on each node, handed unquoted to the C++ compiler; pointless without compile
            {"compile_cache": cache is None or (self.compile and "://" not in cache and " " not in cache)},
            "a compile cache is a local folder on each node, without spaces, and needs --compile",
        )


@dataclass(frozen=True)
class Plan:
    """Resources resolved from the config and the cluster, and how each actor builds its model."""

    device: str
    decode: str
    actors: int
    actor_cpus: float
    actor_gpus: float
    read_cpus: float
    read_tasks: int
    batch_size: int
    threads: int  # torch intra-op threads per actor
    read_in_actor: bool = False
    cpu_decode_share: float = 0.5  # decode "split" only
    compile: bool = False
    compile_cache: str | None = None


def plan_resources(cfg: LabelConfig, cpus: float, gpus: float, node_cpus: list[float] | None = None) -> Plan:
    """Pool size, per-actor resources and batch size from the cluster's CPUs and GPUs.

    Args:
        node_cpus: CPUs of each node (default: one node of ``cpus``); no CPU actor asks for more than
            the nodes can place.
    """
    if (cfg.device or "").startswith("cuda") and gpus < 1:
        raise LabelError(f"--device {cfg.device} asked for, but the Ray cluster has no GPU")
    use_gpu = gpus >= 1 and (cfg.device or "cuda").startswith("cuda")
    decode = cfg.decode if cfg.decode != "auto" else ("gpu" if use_gpu else "cpu")
    if use_gpu:
        per_gpu = max(1, cfg.actors_per_gpu)
        actors = cfg.actors or int(gpus) * per_gpu
        # Read tasks get the CPUs the actors leave; with CPU decode they are the decoders.
        return Plan(
            "cuda",
            decode,
            actors,
            1.0,
            1.0 / per_gpu,
            1.0,
            max(1, int(cpus) - actors),
            cfg.batch_size or 512,
            1,
            read_in_actor=cfg.read == "actor",
            cpu_decode_share=cfg.cpu_decode_share,
            compile=cfg.compile,
            compile_cache=cfg.compile_cache,
        )
    # Several narrow actors beat one wide one on CPU: a forward pass on one thread spends ~12% less CPU per
    # image than on two (no intra-op barriers), so up to 8 cores every core gets its own actor; beyond, 8
    # actors share the cores.
    if cfg.actors:
        actors, threads = cfg.actors, max(1, int(round(cpus / cfg.actors)))
    else:
        actors = max(1, min(8, int(cpus)))
        threads = max(1, int(cpus) // actors)
    # Actors hold half of the CPUs between them (fractional, so that reads always find a slot); torch
    # threads use the actor's share of cores, the read tasks fill the gaps between forward passes.
    actor_cpus = max(0.25, cpus * 0.5 / actors)
    if node_cpus is not None:  # half of the cluster can be more than a node has (1 actor on 2+2+1 CPUs: 2.5)
        from fashionlabel.runtime import worker_cpus

        actor_cpus = min(actor_cpus, max(0.25, 0.5 * worker_cpus(actors, node_cpus)))
    return Plan(
        "cpu",
        decode,
        actors,
        actor_cpus,
        0.0,
        min(1.0, max(0.25, cpus * 0.25)),
        max(1, int(cpus)),
        cfg.batch_size or 256,
        threads,
        read_in_actor=cfg.read != "tasks",
        cpu_decode_share=cfg.cpu_decode_share,
        compile=cfg.compile,
        compile_cache=cfg.compile_cache,
    )
