"""Library behind the pipeline stages: a small core (`core`) and one package per track (`vision`, `text`)."""
