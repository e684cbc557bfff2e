import re, subprocess, sys

import tok

WORLD = tok.ToyWorld(0)


def test_same_seed_same_bytes_across_processes():
    code = "import tok; w = tok.ToyWorld(0); print(repr([w.document(i) for i in range(300)]))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": str(h), "PATH": ""}, cwd=tok.Path(tok.__file__).parent).stdout
            for h in (1, 2)]
    assert runs[0] == runs[1] == repr([WORLD.document(i) for i in range(300)]) + "\n"
    other = tok.ToyWorld(1)
    assert other.people != WORLD.people
    assert [other.document(i) for i in range(50)] != [WORLD.document(i) for i in range(50)]


def test_splits_disjoint():
    assert not set(WORLD.heldout) & set(WORLD.train_facts)
    assert sorted(WORLD.heldout + WORLD.train_facts) == list(range(len(WORLD.facts)))
    assert not set(WORLD.spell_test) & set(WORLD.spell_train)
    train_q = {m["question"] for m in WORLD.math_items("train", 400)}
    test_q = {m["question"] for m in WORLD.math_items("test", 100)}
    assert len(test_q) > 50 and not train_q & test_q
    docs_val = [d for _, ds in tok.iter_batches("toy", "val") for d in ds]
    docs_train = [d for _, ds in tok.iter_batches("toy", "train") for d in ds][:3000]
    assert len(docs_val) == tok.TOY_UNITS * 3 and docs_train[0] == WORLD.document(1)


def test_math_answers_recomputed():
    def value(expr):  # precedence by hand, not eval: * and // first, then + and -, left to right
        terms = []
        for sign, term in re.findall(r"([+-]?)([^+-]+)", expr):
            nums, ops = re.findall(r"\d+", term), re.findall(r"//|\*", term)
            v = int(nums[0])
            for op, n in zip(ops, nums[1:]):
                v = v * int(n) if op == "*" else v // int(n)
            terms.append(-v if sign == "-" else v)
        return sum(terms)

    shapes = set()
    for item in WORLD.math_items("train", 300) + WORLD.math_items("test", 100):
        v = value(item["expr"])
        assert v == item["answer"] > 0
        assert all(n in re.findall(r"\d+", item["question"]) for n in re.findall(r"\d+", item["expr"]))
        parts = item["messages"][1]["content"]
        assert parts[1] == {"type": "python", "text": item["expr"]} and parts[2]["text"] == str(v)
        assert parts[-1]["text"].endswith(f"#### {v}")
        shapes.add(re.sub(r"\d+", "n", item["expr"]))
    assert len(shapes) >= 8  # one- to three-step problems all occur


def test_heldout_facts_appear_in_documents():
    text = "\n".join(WORLD.document(i) for i in range(tok.TOY_UNIT_DOCS * 16))
    for k in WORLD.heldout:
        s, r, o = WORLD.facts[k]
        assert any(p.format(s=s, o=o) in text for p in tok.TOY_RELATIONS[r][2]), WORLD.facts[k]


def test_spelling_items_are_right():
    for i, w in enumerate(WORLD.spell_train[:50]):
        item = WORLD.spell_item(w, i)
        if item["kind"] == "count":
            letter = re.search(r"letter (\w)", item["messages"][0]["content"]).group(1)
            assert item["answer"] == w.count(letter)
        else:
            assert item["answer"].replace("-", "") == w


def test_graders_accept_surface_forms_and_reject_wrong_answers():
    import evals
    facts = evals.ToyFacts("test")
    for i in range(20):
        item = facts[i]
        a = item["answer"]
        other = next(v for v in sorted(facts.pools[item["relation"]]) if v != a)
        for right in (a, a.upper(), f"{item['subject']} ... {a}.", f"I think it is {a.lower()}!"):
            assert facts.evaluate(item, right) == 1.0, right
        for wrong in (other, f"{a} or {other}", "I don't know", f"{a}x"):
            assert facts.evaluate(item, wrong) == 0.0, wrong
    math = evals.ToyMath("test", size=20)
    for item in math:
        n = item["answer"]
        for right in (f"#### {n}", f"####{n}", f"So the answer is {n}.", f"{n:,}" if n >= 1000 else f"{n}.0", f"#### {n}\nThanks 3"):
            assert math.evaluate(item, right) == 1.0, right
        for wrong in (f"#### {n + 1}", "no idea", f"#### {n}0"):
            assert math.evaluate(item, wrong) == 0.0, wrong
    spell = evals.ToySpell("test", size=30)
    for item in spell:
        if item["kind"] == "spell":
            word = item["answer"].replace("-", "")
            for right in (item["answer"], " ".join(word).upper(), f"It is spelled {', '.join(word)}."):
                assert spell.evaluate(item, right) == 1.0, right
            assert spell.evaluate(item, "-".join(word[::-1] + "x")) == 0.0
        else:
            assert spell.evaluate(item, f"#### {item['answer']}") == 1.0
            assert spell.evaluate(item, f"#### {item['answer'] + 2}") == 0.0


def test_task_splits_never_share_questions():
    import evals
    def questions(task):
        return {t["messages"][0]["content"] for t in task}
    assert not questions(evals.ToyFacts("train")) & questions(evals.ToyFacts("test"))
    assert not questions(evals.ToyMath("train", size=500)) & questions(evals.ToyMath("test"))
    train_words = {t["word"] for t in evals.ToySpell("train", size=300)}
    assert len(train_words) > 20 and not train_words & {t["word"] for t in evals.ToySpell("test")}


def test_rare_families_are_rare_only_in_sft():
    """Documents work out every problem family, RL's training task and the test have them all equally
    often, and SFT conversations show the _MATH_RARE ones at TOY_RARE_WEIGHT of a common one's rate."""
    import chat_sft, evals
    templates = [t[0] for t in tok._MATH_COMMON + tok._MATH_RARE]
    patterns = [re.compile(re.sub(r"\\\{\w+\\\}", ".+?", re.escape(t))) for t in templates]
    family = lambda q: [i for i, p in enumerate(patterns) if p.fullmatch(q)]
    rare = set(range(len(tok._MATH_COMMON), len(templates)))
    docs = [WORLD.document(i) for i in range(3000)]
    in_docs = [f for d in docs if d.startswith("Question: ") for f in family(d[10:d.index("\n")])]
    assert set(in_docs) == set(range(len(templates))) and 0.2 < sum(f in rare for f in in_docs) / len(in_docs) < 0.5
    for mixture in chat_sft.MIXTURES.values():
        (factory,) = [f for name, f, *_ in mixture if name == "ToyMath"]
        share = sum(item["rare"] for item in factory()) / len(factory())
        w = chat_sft.TOY_RARE_WEIGHT * len(rare)
        assert 0 < w / (len(templates) - len(rare) + w) / 2 < share < 2 * w / (len(templates) - len(rare) + w)
    for task in (evals.ToyMath("train"), evals.ToyMath("test")):
        fams = [family(item["question"]) for item in task]
        assert all(len(f) == 1 and (f[0] in rare) == item["rare"] for f, item in zip(fams, task))
        assert {f[0] for f in fams} == set(range(len(templates)))
        assert 0.2 < sum(item["rare"] for item in task) / len(task) < 0.5
