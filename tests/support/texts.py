"""Varied texts for embedding tests and benchmarks: prose, questions, other scripts, emoji, code,
very short and whitespace-only texts."""

from __future__ import annotations

import random

SUBJECTS = ["The old fisherman", "A young engineer", "My neighbour's dog", "The city council", "Our marketing team",
            "A curious child", "The orchestra", "This startup", "The research group", "An elderly woman",
            "The football club", "A tired nurse", "The local bakery", "Two students", "The weather service"]
VERBS = ["repaired", "discussed", "photographed", "rejected", "celebrated", "analysed", "painted", "ignored",
         "borrowed", "delivered", "designed", "questioned"]
OBJECTS = ["the broken bridge", "a new budget proposal", "the sunset over the harbour", "the quarterly report",
           "an unusual fossil", "the train timetable", "a batch of sourdough bread", "the solar panels",
           "a controversial painting", "the results of the clinical trial", "a stack of old letters",
           "the school's heating system"]
TAILS = ["", " yesterday", " after a long debate", " despite the heavy rain", " for the third time this year",
         " with surprising enthusiasm", " before anyone noticed", " in under ten minutes"]
QUESTIONS = ["How do I {}?", "Why does {}?", "What is the best way to {}?"]
TASKS = ["bake bread without yeast", "the moon cause tides", "learn a new language quickly",
         "configure a reverse proxy", "water boil faster at altitude", "fix a leaking tap",
         "train a neural network on a laptop", "my cat ignore me", "invest with little money", "write a cover letter"]
OTHER_SCRIPTS = [
    "Le chat dort sur le canapé depuis ce matin.", "Je voudrais réserver une table pour deux personnes.",
    "Der Zug nach Berlin hat zwanzig Minuten Verspätung.", "Ich habe gestern ein spannendes Buch gelesen.",
    "¿Dónde está la estación de tren más cercana?", "Mañana vamos a la playa con mis primos.",
    "Мы пошли гулять в парк, несмотря на дождь.", "Москва — столица России.", "今日はとても良い天気ですね。",
    "東京駅までの行き方を教えてください。", "我喜欢在周末读书和喝茶。", "北京是中国的首都。",
    "الطقس جميل اليوم في المدينة.", "أين أقرب صيدلية؟", "मुझे हिंदी में किताबें पढ़ना पसंद है।",
    "Η θάλασσα ήταν ήρεμη το πρωί.", "서울은 한국의 수도입니다.", "שלום, מה שלומך היום?", "ฉันชอบกินข้าวผัดมาก",
    "Bugün hava çok güzel, dışarı çıkalım.", "Dziękuję bardzo za pomoc!", "Vi ses i morgon på kontoret.",
    "Olá, tudo bem com você?", "Tôi thích uống cà phê sữa đá."]
EMOJI = ["I love this! 😍🔥🎉", "🚀🌕👩‍🚀", "Great job team 👏👏👏", "Feeling sick today 🤒☔", "🍕 or 🍣 tonight?",
         "Happy birthday!!! 🎂🎈🥳", "👍", "This is fine 🔥🐶☕🔥", "Flags: 🇫🇷 🇯🇵 🇧🇷 🇿🇦", "Family: 👨‍👩‍👧‍👦"]
TECHNICAL = ["def add(a, b):\n    return a + b", "SELECT name, COUNT(*) FROM users GROUP BY name;",
             "Call +1 (555) 010-9999 or mail hello@example.com", "https://example.com/path?query=1&lang=en#section",
             "Revenue rose 12.5% to $4.3 billion in Q3 2024.", "Error 0x80070005: access denied (code=5)",
             "for (int i = 0; i < n; ++i) { sum += a[i]; }", "Temperature: -40 °C = -40 °F",
             "{\"key\": [1, 2, 3], \"ok\": true}", "rm -rf /tmp/cache && make -j8 install"]
SHORT = ["ok", "Yes.", "no", "?", "Thanks!", "hello", "A", "42", "...", "Why?"]
EMPTY_AFTER_STRIP = ["", " ", "\n\t  ", "\u3000\u00a0 "]


def varied_sentences(n_prose: int = 200, seed: int = 7) -> list[str]:
    """Template prose, questions, other scripts, emoji, code and numbers, very short texts, texts
    far beyond the 256-token max length, and texts that are empty after strip (~300 in all)."""
    rng = random.Random(seed)
    out = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."
           for _ in range(n_prose)]
    out += [q.format(t) for q in QUESTIONS for t in TASKS]
    out += OTHER_SCRIPTS + EMOJI + TECHNICAL + SHORT + EMPTY_AFTER_STRIP
    out += [" ".join(rng.choice(out[:n_prose]) for _ in range(40 + 10 * k)) for k in range(8)]
    out.append(" ".join(OTHER_SCRIPTS * 6))
    return out
