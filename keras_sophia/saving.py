"""A `.keras` file reloads with the compile it was saved with, whatever
the model class."""

import keras


class RestoresCompile:
    """Mixin: loading replays the saved `compile` (optimizer, loss,
    metrics, ...) even where the model class overrides `compile`.

    Keras replays it only for classes that keep Keras's own `compile`.
    keras-hub's task models override it (to fill in their defaults), so a
    `.keras` file of `class LM(SophiaTrainStep, GPT2CausalLM)` would come
    back compiled with keras-hub's default Adam at iteration 0, Sophia's
    `m`, `h` and seed dropped with only a warning. The overrides we know
    take Keras's arguments, so they are replayed here; the loader then
    restores the optimizer's variables into the optimizer built here.
    """

    def compile_from_config(self, config):
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)
