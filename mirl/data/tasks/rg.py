"""Any reasoning-gym dataset as a task: its question is the prompt, its scorer the checker.

    task = ReasoningGymTask("basic_arithmetic")     # reasoning_gym.create_dataset(name, size, seed)
The completion's first line is the answer (the prompt ends in "Answer: ").
"""

from __future__ import annotations


class ReasoningGymTask:
    score_columns = ("rg_entry",)  # the fields of an example that score() reads

    def __init__(self, dataset: str, **kwargs):
        import reasoning_gym

        self.dataset_name, self.kwargs = dataset, kwargs
        self.name = f"rg:{dataset}"
        self._rg = reasoning_gym
        try:  # fail at construction with the list of valid names
            reasoning_gym.create_dataset(dataset, size=1, seed=0, **kwargs)
        except Exception as e:
            from reasoning_gym.factory import DATASETS

            raise ValueError(
                f"reasoning-gym dataset {dataset!r} failed ({e}); valid names: {', '.join(sorted(DATASETS))}"
            ) from e

    def examples(self, split: str, n: int, seed: int = 0) -> list[dict]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        s = seed * 2 + (1 if split == "test" else 0) + 12345
        ds = self._rg.create_dataset(self.dataset_name, size=n, seed=s, **self.kwargs)
        out = []
        for i in range(n):
            entry = ds[i]
            out.append(
                {
                    "prompt": f"{entry['question']}\nAnswer: ",
                    "answer": str(entry["answer"]),
                    "solution": str(entry["answer"]),
                    "rg_entry": entry,
                }
            )
        return out

    @staticmethod
    def extract(completion: str) -> str:
        return completion.strip().splitlines()[0].strip() if completion.strip() else ""

    def score(self, completion: str, example: dict) -> float:
        entry = example.get("rg_entry")
        if entry is None:
            raise ValueError(f"example has no 'rg_entry' for reasoning-gym scoring: {example.get('prompt')!r}")
        scorer = self._rg.get_score_answer_fn(self.dataset_name)
        return float(scorer(answer=self.extract(completion), entry=entry))
