package qmp_test

import (
	"context"
	"errors"
	"fmt"
	"log"
	"time"

	"github.com/vmlock/vmlock/qmp"
)

// Start QEMU with a QMP monitor, run a command, and wait for the event it
// causes without a chance of missing it.
func Example() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, cmd, err := qmp.StartQEMU(ctx, "qemu-system-x86_64",
		[]string{"-machine", "none", "-nodefaults", "-display", "none", "-accel", "tcg"})
	if err != nil {
		log.Fatal(err)
	}
	defer func() {
		c.Close()
		cmd.Process.Kill()
		cmd.Wait()
	}()

	// Subscribe first: QEMU may send STOP before stop's reply.
	sub := c.Subscribe("STOP")
	defer sub.Close()
	if err := c.Execute(ctx, "stop", nil, nil); err != nil {
		log.Fatal(err)
	}
	ev, err := sub.Wait(ctx, nil)
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ev.Name)

	// QMP error replies are typed.
	var qe *qmp.Error
	if err := c.Execute(ctx, "no-such-command", nil, nil); errors.As(err, &qe) {
		fmt.Println(qe.Class)
	}
}
