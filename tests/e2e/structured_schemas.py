"""Twenty JSON schemas of the kinds structured-output callers send, each with a question the
default model can answer: enums, nested objects, arrays, required and optional fields, numbers
with bounds, nullable fields, anyOf, string patterns and lengths."""

from __future__ import annotations

NAME = {"type": "string", "maxLength": 40}

CASES = [
    ("What is the capital of France?", {
        "type": "object", "properties": {"capital": NAME}, "required": ["capital"],
        "additionalProperties": False}),
    ("Is the sky blue? Answer yes or no.", {
        "type": "object", "properties": {"answer": {"enum": ["yes", "no"]}},
        "required": ["answer"], "additionalProperties": False}),
    ("What is 2 + 3?", {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
                                         "total": {"type": "integer"}},
        "required": ["a", "b", "total"], "additionalProperties": False}),
    ("Name three colours.", {
        "type": "object", "properties": {"colours": {"type": "array", "items": NAME,
                                                     "minItems": 3, "maxItems": 3}},
        "required": ["colours"], "additionalProperties": False}),
    ("Describe a cat.", {
        "type": "object", "properties": {
            "animal": {"const": "cat"}, "legs": {"type": "integer", "minimum": 0, "maximum": 8},
            "sound": NAME},
        "required": ["animal", "legs", "sound"], "additionalProperties": False}),
    ("Give a person's name and address.", {
        "type": "object", "properties": {
            "name": NAME,
            "address": {"type": "object", "properties": {"city": NAME, "country": NAME},
                        "required": ["city", "country"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}),
    ("Rate the movie Titanic from 1 to 5.", {
        "type": "object", "properties": {"movie": NAME, "stars": {"enum": [1, 2, 3, 4, 5]}},
        "required": ["movie", "stars"], "additionalProperties": False}),
    ("List two fruits with their colours.", {
        "type": "array", "minItems": 2, "maxItems": 2, "items": {
            "type": "object", "properties": {"fruit": NAME, "colour": NAME},
            "required": ["fruit", "colour"], "additionalProperties": False}}),
    ("What is the boiling point of water in Celsius?", {
        "type": "object", "properties": {"celsius": {"type": "number"}},
        "required": ["celsius"], "additionalProperties": False}),
    ("Is Paris in Germany?", {
        "type": "object", "properties": {"in_germany": {"type": "boolean"}},
        "required": ["in_germany"], "additionalProperties": False}),
    ("Classify the sentiment of: 'I love this phone'.", {
        "type": "object", "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["sentiment", "confidence"], "additionalProperties": False}),
    ("Write a short title for a blog post about tea.", {
        "type": "object", "properties": {"title": {"type": "string", "minLength": 3,
                                                   "maxLength": 60}},
        "required": ["title"], "additionalProperties": False}),
    ("Give today's weather in London.", {
        "type": "object", "properties": {
            "city": NAME, "temperature": {"type": "integer"},
            "unit": {"enum": ["celsius", "fahrenheit"]}, "raining": {"type": "boolean"}},
        "required": ["city", "temperature", "unit", "raining"],
        "additionalProperties": False}),
    ("What is the largest planet?", {
        "type": "object", "properties": {"planet": NAME, "moons": {"type": ["integer", "null"]}},
        "required": ["planet", "moons"], "additionalProperties": False}),
    ("Give an ISO date for New Year's Day 2025.", {
        "type": "object", "properties": {"date": {"type": "string",
                                                  "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
        "required": ["date"], "additionalProperties": False}),
    ("Describe a book.", {
        "type": "object", "properties": {
            "title": NAME, "author": NAME, "year": {"type": "integer"},
            "tags": {"type": "array", "items": NAME, "maxItems": 3}},
        "required": ["title", "author"], "additionalProperties": False}),
    ("Answer with a number or the word unknown: how many legs does a spider have?", {
        "type": "object", "properties": {"legs": {"anyOf": [{"type": "integer"},
                                                            {"const": "unknown"}]}},
        "required": ["legs"], "additionalProperties": False}),
    ("Give a recipe name and its steps.", {
        "type": "object", "properties": {
            "recipe": NAME,
            "steps": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
                "type": "object", "properties": {"n": {"type": "integer"}, "text": NAME},
                "required": ["n", "text"], "additionalProperties": False}}},
        "required": ["recipe", "steps"], "additionalProperties": False}),
    ("Translate 'hello' into French.", {
        "type": "object", "properties": {"source": {"const": "hello"}, "french": NAME},
        "required": ["source", "french"], "additionalProperties": False}),
    ("Which is heavier, a kilo of iron or a kilo of feathers?", {
        "type": "object", "properties": {
            "answer": {"enum": ["iron", "feathers", "same"]}, "reason": NAME},
        "required": ["answer"], "additionalProperties": False}),
]  # fmt: skip
